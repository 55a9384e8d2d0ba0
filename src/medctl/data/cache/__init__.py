"""The parts of `medctl preprocess` (:mod:`medctl.data.preprocess` is the recipe): plan, pool, one sample, journal,
manifest, summary, and the memory one worker needs."""
