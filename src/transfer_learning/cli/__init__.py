"""The commands a user types, each also a console script (``pyproject.toml``):

========== ============================================================ ======================
tl-train   ``python train.py key=value ...``                            Hydra, conf/train.yaml
tl-eval    ``python eval.py ckpt_path=CKPT key=value ...``              Hydra, conf/eval.yaml
tl-predict ``python -m transfer_learning.results.predict ckpt_path=CKPT images=PATHS ...``
tl-export  ``python scripts/export.py ckpt_path=CKPT format=onnx ...``
========== ============================================================ ======================

One style: settings as ``key=value`` (a list as ``key=[a,b]``), the checkpoint as ``ckpt_path=``,
``--help`` for the list. Train and eval are Hydra apps (:mod:`.hydra_entry`); predict and export
declare their settings with :mod:`.options`. Each module here reads its command line before
torch loads, so ``--help`` and a mistake answer at once, and turns a command line in an older
form (positional arguments, ``--flags``) into one line with the new form.
"""
