"""Reliable seeds ("All Seeds Are Not Equal", spec ``reliable_seeds.md``).

* :mod:`.mining` -- per seed and category accuracy, the chi-square test of seed and success, the top seeds (pure).
* :mod:`.file` -- the ``reliable_seeds.json`` file and its initial latents.
* :mod:`.reliable` -- ``--seeds reliable:FILE[:K]``: each prompt's seeds from the top seeds of its category.
* :mod:`.dataset` -- the fine-tuning data set made with the top seeds (folder format in ``docs/seeds.md``).
"""
