"""Framework integrations: each module imports its framework, so import only the one you use.

- ``ckptd_client.integrations.hf``: a Hugging Face ``TrainerCallback`` that saves through ckptd,
  and ``CkptdTrainer`` (or ``CkptdResumeMixin``) that resumes through the Trainer's own resume path.
- ``ckptd_client.integrations.lightning``: a PyTorch Lightning ``CheckpointIO`` plugin.

Both build on ``CheckpointManager`` (one save = one step of one rank's state) and hand
``restore`` the exact state they want filled: they never rely on a restore adding keys.
Nothing here is imported by ``ckptd_client`` itself.
"""
