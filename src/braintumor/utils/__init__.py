"""Small shared utilities: atomic writes, locks, devices, fingerprints, seeding, output folders."""
