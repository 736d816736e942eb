"""Teachers, the models being distilled: ``flow_matching`` (train / save / load the 2-D flow-matching
velocity MLP), ``bootstrap`` (train an EDM-preconditioned SongUNet on a prepared dataset), ``edm_pickle``
(import a released EDM network pickle with a restricted unpickler), ``registry`` (register teachers under
an artifact root) and ``events`` (the ``kdm.teacher.registered`` Prefect event)."""
