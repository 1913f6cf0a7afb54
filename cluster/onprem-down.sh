#!/bin/sh
# Stop everything `ray up cluster/onprem.yaml` started, on every host: the trainctl API, Ray on the head
# (`ray down`), and Ray on every worker host, which Ray's local provider leaves running (its `ray down` stops
# Ray on the head only; a worker whose head is gone would linger until its raylet gives up on the GCS).
# Job data stays in S3; the job list stays in ~/trainctl-data on the head.
#
#   sh cluster/onprem-down.sh cluster/onprem.yaml
set -eu
config=${1:?usage: sh cluster/onprem-down.sh CLUSTER_YAML}

ray exec "$config" 'trainctl down --data-dir ~/trainctl-data --grace 5' || echo "note: could not stop the trainctl API" >&2
ray down -y "$config"
# user, key, address of every worker host, from the cluster file.
python - "$config" <<'PY' | while read -r user key address; do
import os, sys, yaml
c = yaml.safe_load(open(sys.argv[1]))
for ip in c["provider"]["worker_ips"]:
    print(c["auth"]["ssh_user"], os.path.expanduser(c["auth"]["ssh_private_key"]), ip)
PY
  ssh -n -i "$key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR \
      -o BatchMode=yes -o ConnectTimeout=10 "$user@$address" \
      'bash -lc ". ~/.trainctl/node.sh 2>/dev/null; ray stop --force > /dev/null 2>&1; true"' ||
    echo "note: could not reach worker host $address" >&2
done
