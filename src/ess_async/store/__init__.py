"""Message stores: the spool folders of one host, or PostgreSQL for a fleet.

``open_store`` picks one from the config (``[store] url``), ``ESS_STORE_URL`` or an
explicit URL, the later winning.
"""

from __future__ import annotations

from .base import MessageRef, Store

__all__ = ("MessageRef", "Store")
