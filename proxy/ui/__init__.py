"""The approvers' web inbox (`/_countersign/ui/`): OIDC login with PKCE, signed sessions,
server-rendered pages, decisions through the approvals service."""

from .views import Inbox, InboxEvents, setup_ui, ui_routes

__all__ = ["Inbox", "InboxEvents", "setup_ui", "ui_routes"]
