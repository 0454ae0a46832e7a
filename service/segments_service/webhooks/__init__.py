"""Webhooks: each entry/exit of a project's tracked segments POSTed, signed,
to the URLs the project registered, in feed order per webhook, at least once.

registry.py serves the API (create, list, get, delete, deliveries); outbox.py fills each
webhook's deliveries from the membership feed and records attempts; sender.py makes one
signed attempt to a checked address; worker.py runs the deliveries of one server.
"""

from segments_service.webhooks.registry import (
    MAX_DELIVERIES,
    MAX_WEBHOOKS,
    DeliveryView,
    WebhookView,
    check_url,
    create_webhook,
    delete_webhook,
    get_webhook,
    list_deliveries,
    list_webhooks,
)
from segments_service.webhooks.sender import SIGNATURE_HEADER, Sender, address_problem, signature
from segments_service.webhooks.worker import WebhookWorker, retry_delay

__all__ = [
    "MAX_DELIVERIES",
    "MAX_WEBHOOKS",
    "SIGNATURE_HEADER",
    "DeliveryView",
    "Sender",
    "WebhookView",
    "WebhookWorker",
    "address_problem",
    "check_url",
    "create_webhook",
    "delete_webhook",
    "get_webhook",
    "list_deliveries",
    "list_webhooks",
    "retry_delay",
    "signature",
]
