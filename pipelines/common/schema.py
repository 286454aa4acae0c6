"""The one row schema of tokenized parts and packed shards (DESIGN §5).

Views (``tokenize.views_per_image`` = K): with K = 1 the schema is exactly
SHARD_SCHEMA (one view per image: the centre crop in ``image`` / ``visual_tokens``).
With K > 1 every row still holds one sample (the row count does not change with K)
and two list columns follow SHARD_SCHEMA's (VIEW_FIELDS):

    image / visual_tokens          view 0: the un-augmented centre crop (what
                                   evaluate and report read, so they do not change)
    aug_images[v - 1]              view v = 1..K-1: PNG of an augmented view
    aug_visual_tokens[v - 1]       its codes (same grid as visual_tokens)

both null for text rows and K - 1 long for image and pair rows. The schema's
metadata records K (VIEWS_KEY); pack copies K and VIEW_LAYOUT into manifest.json.
"""
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

VIEW_FIELDS = (
    pa.field("aug_images", pa.list_(pa.binary())),                   # views 1..K-1 (PNG); null for text
    pa.field("aug_visual_tokens", pa.list_(pa.list_(pa.int16()))),   # their code grids; null for text
)
VIEW_COLUMNS = [f.name for f in VIEW_FIELDS]
VIEWS_KEY = b"beit3.views_per_image"  # schema metadata: K, present only with the view columns
VIEW_LAYOUT = {"view_0": ["image", "visual_tokens"],                 # the centre crop
               "views_1_to_k_minus_1": VIEW_COLUMNS}                 # list item v - 1 is view v


def shard_schema(views_per_image: int = 1) -> pa.Schema:
    """SHARD_SCHEMA for K = 1; with K > 1 the view columns follow and the metadata records K."""
    if views_per_image == 1:
        return SHARD_SCHEMA
    return pa.schema(list(SHARD_SCHEMA) + list(VIEW_FIELDS), metadata={VIEWS_KEY: str(views_per_image).encode()})


def views_of(schema: pa.Schema, where: str) -> int:
    """K of a part's or shard's schema: 1 without the view columns, else the recorded K."""
    if VIEW_COLUMNS[0] not in schema.names:
        return 1
    recorded = (schema.metadata or {}).get(VIEWS_KEY)
    if recorded is None:
        raise ValueError(f"{where}: view columns {VIEW_COLUMNS} but no {VIEWS_KEY.decode()} in the schema metadata")
    return int(recorded)


def shard_table(rows: dict[str, list], views_per_image: int = 1) -> pa.Table:
    """Column lists -> a table in shard_schema(K) (raises on a wrong type or a bad modality);
    keys of ``rows`` beyond the schema's columns are ignored."""
    bad = sorted(set(rows.get("modality", [])) - set(MODALITIES))
    if bad:
        raise ValueError(f"unknown modality {bad}; expected one of {list(MODALITIES)}")
    schema = shard_schema(views_per_image)
    return pa.table({f.name: pa.array(rows[f.name], type=f.type) for f in schema}, schema=schema)


def check_schema(table: pa.Table, where: str, views_per_image: int = 1) -> None:
    """Fail naming ``where`` unless ``table`` has exactly shard_schema(K)'s columns and types."""
    expected = shard_schema(views_per_image)
    if not table.schema.equals(expected, check_metadata=False):
        raise ValueError(f"{where}: schema {table.schema} is not the shard schema {expected}")
