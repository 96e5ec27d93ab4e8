"""fastaphlict: a drop-in, fast replacement for Phorge's Aphlict notification server.

Phorge posts JSON to the admin port; browsers hold WebSockets on the client
port and receive every message whose ``subscribers`` name one of their PHIDs.
The wire contract is Aphlict's, byte for byte where Phorge can tell.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
