"""Input datasets read as a stream of Arrow record batches: one module per format, :class:`Source` over them."""

from pipeline.io.source.common import DTYPES, FORMATS
from pipeline.io.source.csv import first_invalid_utf8
from pipeline.io.source.keys import check_id_column, row_keys
from pipeline.io.source.parquet import lossless_common_type
from pipeline.io.source.reader import Source

__all__ = ["DTYPES", "FORMATS", "Source", "check_id_column", "first_invalid_utf8", "lossless_common_type", "row_keys"]
