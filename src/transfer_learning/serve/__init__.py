"""Serving a checkpoint over HTTP: ``tl-serve`` (:mod:`transfer_learning.cli.serve`), the
application (:mod:`.app`), dynamic batching (:mod:`.batcher`), reading uploads (:mod:`.uploads`),
starting and stopping it (:mod:`.server`) and the web page (``static/``)."""
