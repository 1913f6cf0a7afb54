"""`python -m service.client.cli ...` = `trainctl ...`."""

from service.client.cli.main import main

main()
