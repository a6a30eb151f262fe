"""What the consumer created in Girder, and may therefore empty, delete or fill.

Pure (no Girder client here). An item or folder is the consumer's when both hold:

* Girder says its ``creatorId`` is the user of the API key (Girder sets it; no other
  account can make a document look like ours);
* its metadata holds :data:`OWNER_FIELD` with the owner token of that user, a digest no
  person types and no other program writes (a person using the same account in
  Girder's web pages makes items without it).

The token depends on the user only, so it survives restarts, a new consumer group
(``create_new`` gives a new one at every start) and a second consumer of the group on
another machine with another key of the same user: each recognises what the others
left (an item whose streamed upload was interrupted, an empty folder). Anything else
-- an item a person made, one an older version of this program made before it marked
them, one made with another account -- is never deleted, emptied or filled; only
``--replace_existing`` replaces the contents of an item named like the file, as
documented.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = ["OWNER_FIELD", "TAG_FIELD", "Owner", "owner_token"]

#: Metadata key of every item and folder the consumer creates (value: the owner token).
OWNER_FIELD = "gusCreatedBy"
#: Item metadata key marking an item whose file is still being streamed (value: group).
TAG_FIELD = "gusStreamingUpload"
_PREFIX = "girder-upload-stream owner mark\0"


def owner_token(user_id: str) -> str:
    """The owner token of the Girder user ``user_id``: ``gus1-`` and 32 hex digits."""
    digest = hashlib.sha256((_PREFIX + user_id).encode()).hexdigest()
    return f"gus1-{digest[:32]}"


@dataclass(frozen=True)
class Owner:
    """The consumer's identity in Girder: the API key's user."""

    user_id: str

    @property
    def token(self) -> str:
        return owner_token(self.user_id)

    def mark(self) -> dict[str, str]:
        """The metadata that marks a document as created by the consumer."""
        return {OWNER_FIELD: self.token}

    def owns(self, doc: dict[str, Any] | None) -> bool:
        """Whether the item or folder ``doc`` (as Girder answers it) is the consumer's."""
        if not doc:
            return False
        meta = doc.get("meta") or {}
        return str(doc.get("creatorId")) == self.user_id \
            and isinstance(meta, dict) and meta.get(OWNER_FIELD) == self.token
