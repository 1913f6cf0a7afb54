"""Moved to service/client/cli/ (the `trainctl` command). This name stays so that what was installed or written
before the move keeps working: an editable install's `trainctl` script (`from service.cli import main`, until
pip reinstalls it) and `python -m service.cli ...`."""

from service.client.cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
