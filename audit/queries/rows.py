"""`rows`: the attacker's own transfer rows, asked once each (the audit before query strategies)."""
from __future__ import annotations

from audit.queries.base import QuerySpec

ROWS = QuerySpec("rows", "the transfer rows themselves (no synthetic query)", synthesise=None,
                 reference="LS on the rows' true labels (ε chosen on validation)")
