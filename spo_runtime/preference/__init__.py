"""The preference model, usable by serving, evaluation and training alike (ARCHITECTURE.md's `preference`
layer: it imports leaf, core and model's weight pins, never the engine, training or the service):

- `spm`: the step-aware preference model (SPM) of SPO; `spm_weights`: its checkpoint files; `spm_source`: where
  they come from (SPO_SPM, SPO_SPM_TOKENIZER, the hub);
- `scorers`: the `PreferenceScorer` interface, the SPM and toy scorers, and their factory (`build_scorer`,
  `scorer_from_settings`: SPO_SCORER).

Nothing is re-exported here: each name is imported from the one module that defines it.
"""
