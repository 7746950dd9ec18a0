"""Storage tiers behind one protocol (``ckptd.tiers.base.Tier``)."""
