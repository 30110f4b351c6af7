"""Every file the template reads back, read here as plain data, and nowhere else.

A run folder, a checkpoint or a cache is the kind of thing people pass around ("here is my run,
continue it"), so each is read as data a stranger may have written: checkpoints (pickle-free),
a run folder's saved settings and ``run_config.yaml``, ``<checkpoint>.threshold.json``,
``summary.json``, a sweep's ``job.json`` files, the scan cache and feature-cache arrays, the
CSV files of a run or of labels, weights files and the metadata inside an exported model.

Each reader returns plain values (``str``, ``int``, ``float``, ``bool``, ``None``, lists and
string-keyed dicts; tensors or arrays where the file is one) or refuses the file with an
:class:`UntrustedFileError` that names the file, the field and the fix. Nothing read here is
imported, instantiated, unpickled, evaluated or resolved:

* YAML: a loader that builds no Python object from a tag (``!!python/object`` and every other
  explicit tag are refused), follows no anchor or alias (a billion-laughs file is refused at its
  first ``&``), and leaves dates as text;
* config files: a string OmegaConf would resolve (``${oc.env:HOME}``, ``${...}``) is refused;
* every text file is capped in size before it is parsed, and only regular files are opened
  (a FIFO would block, ``/dev/zero`` never ends).

What the plain values may then *build* is :mod:`transfer_learning.run.registry`'s business
(allow-lists); which saved settings a resume puts back is :mod:`transfer_learning.run.resume`'s.
``tests/test_untrusted_files.py`` fails when a parsing call (``json.load``, ``yaml.*load``,
``torch.load``, ``np.load``, ``OmegaConf.load``, ``csv.reader``, pickle...) appears outside this
package.
"""

from transfer_learning.readers.files import (
    SCAN_CACHE_LIMIT,
    SETTINGS_LIMIT,
    SUMMARY_LIMIT,
    KiB,
    MiB,
    NotRegularFile,
    TooLarge,
    UntrustedFileError,
    file_kind,
    read_regular,
)
from transfer_learning.readers.plain import MAX_DEPTH, check_plain
from transfer_learning.readers.settings import (
    json_field,
    read_config,
    read_csv_records,
    read_csv_rows,
    read_json,
    read_string_list,
    read_yaml,
)
from transfer_learning.readers.tensors import (
    pickle_free_library_loads,
    read_array,
    read_checkpoint,
    read_export_metadata,
    read_weights,
)

__all__ = [
    "MAX_DEPTH",
    "SCAN_CACHE_LIMIT",
    "SETTINGS_LIMIT",
    "SUMMARY_LIMIT",
    "KiB",
    "MiB",
    "NotRegularFile",
    "TooLarge",
    "UntrustedFileError",
    "check_plain",
    "file_kind",
    "json_field",
    "pickle_free_library_loads",
    "read_array",
    "read_checkpoint",
    "read_config",
    "read_csv_records",
    "read_csv_rows",
    "read_export_metadata",
    "read_json",
    "read_regular",
    "read_string_list",
    "read_weights",
    "read_yaml",
]
