"""`python -m compute_broker_client`: the same as the `compute-broker-client` command."""

import sys

from compute_broker_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
