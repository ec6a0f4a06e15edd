"""fedcore's wire protocol: messages, framing, session state machines, TLS transport.

It carries opaque bytes and plain values; it knows nothing of Paillier, packing or
torch. Import from here; submodules are split by job.
"""

from .errors import *  # noqa: F403
from .errors import __all__ as _errors_all
from .framing import *  # noqa: F403
from .framing import __all__ as _framing_all
from .messages import *  # noqa: F403
from .messages import __all__ as _messages_all
from .session import *  # noqa: F403
from .session import __all__ as _session_all
from .tls import *  # noqa: F403
from .tls import __all__ as _tls_all
from .transport import *  # noqa: F403
from .transport import __all__ as _transport_all

__all__ = [*_errors_all, *_framing_all, *_messages_all, *_session_all, *_tls_all, *_transport_all]
