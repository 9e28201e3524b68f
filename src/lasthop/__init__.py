"""lasthop: per-connection routing for hosts that run virtual machines."""

from lasthop.config import Config, ConfigError
from lasthop.controller import Controller

__all__ = ["Config", "ConfigError", "Controller"]
__version__ = "0.1.0"
