from r1mega.config.loader import load_config
from r1mega.config.schema import R1Config
from r1mega.config.validate import ConfigError, validate

__all__ = ["ConfigError", "R1Config", "load_config", "validate"]
