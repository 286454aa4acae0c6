"""The one row schema of tokenized parts and packed shards (DESIGN §5)."""
from __future__ import annotations

import pyarrow as pa

from model.modalities import MODALITIES

# Written by tokenize beside its parts, read by pack: the tokenizers the codes came from.
TOKENIZERS = "tokenizers.json"

SHARD_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),            # content hash (hex), stable across runs
    pa.field("modality", pa.string(), nullable=False),      # 'text' | 'image' | 'pair'
    pa.field("text_ids", pa.list_(pa.int32())),             # <s> ... </s>, unpadded; null for images
    pa.field("image", pa.binary()),                         # PNG of the exact tokenized view; null for text
    pa.field("visual_tokens", pa.list_(pa.int16())),        # row-major code grid; null for text
    pa.field("source", pa.string(), nullable=False),        # source name from params.yaml
])


def shard_table(rows: dict[str, list]) -> pa.Table:
    """Column lists -> a table in SHARD_SCHEMA (raises on a wrong type or a bad modality)."""
    bad = sorted(set(rows.get("modality", [])) - set(MODALITIES))
    if bad:
        raise ValueError(f"unknown modality {bad}; expected one of {list(MODALITIES)}")
    return pa.table({f.name: pa.array(rows[f.name], type=f.type) for f in SHARD_SCHEMA},
                    schema=SHARD_SCHEMA)


def check_schema(table: pa.Table, where: str) -> None:
    """Fail naming ``where`` unless ``table`` has exactly SHARD_SCHEMA's columns and types."""
    if not table.schema.equals(SHARD_SCHEMA, check_metadata=False):
        raise ValueError(f"{where}: schema {table.schema} is not the shard schema {SHARD_SCHEMA}")
