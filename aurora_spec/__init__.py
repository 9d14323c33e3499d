"""aurora-spec: speculative decoding whose draft learns online from live traffic."""

__version__ = "0.1.0"
