"""The train command's body, above everything it calls: compose and fit (:mod:`..run`), then
calibrate, test and report (:mod:`..results`); ``cv=K`` runs it once per fold."""
