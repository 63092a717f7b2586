"""The keys of the journal's ``meta`` table: one enum, so no module spells a key by hand."""

from __future__ import annotations

from enum import StrEnum


class Meta(StrEnum):
    SCHEMA_VERSION = "schema_version"  # migrations.SCHEMA_VERSION when written or migrated
    KEY_SCHEME = "key_scheme"  # how rows without an id column are keyed: "content" or "row_number"
    IDENTITY = "identity"  # the job identity the journal belongs to (JSON)
    CREATED = "created"  # epoch seconds
    SPENT_USD = "spent_usd"  # everything billed into this journal
    SPENT_BEFORE_USD = "spent_before_usd"  # what journals set aside by --fresh had spent
    TOTAL_ROWS = "total_rows"  # the input's rows at the last run (pipeline status)
    ADOPTED_BATCHES = "adopted_batches"  # batch ids found at the provider after a crash and adopted (JSON list)
    CANARY_BATCH = "canary_batch"  # batch mode: the canary's batch, from its submission until it is judged
    OUTPUT_WRITTEN = "output_written"  # what the last output write was made from (JSON): engine/unchanged.py
    SETTLED = "settled"  # every input row was done, for these figures (JSON): engine/unchanged.py
