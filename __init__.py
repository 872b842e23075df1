"""migrateflow: move virtual machines between compute hosts with durable TaskFlow flows."""
import warnings

__version__ = "0.1.0"

# oslo.messaging (notifications) needs oslo.service, which installs eventlet;
# TaskFlow imports eventlet through oslo.utils whenever it is installed, and
# eventlet warns at import that it is deprecated.  Nothing here uses eventlet
# (no monkey patching, no green threads): the warning would only be noise on
# every command.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
