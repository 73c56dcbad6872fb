"""compute-broker: hands lab clients EC2 spot workers over a one-line TCP protocol."""

__version__ = "0.1.0"
