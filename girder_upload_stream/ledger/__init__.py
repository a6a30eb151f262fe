"""File states and offsets: the ledger, the commit rule, upload units, and
the processor that turns messages into units and committable offsets."""
