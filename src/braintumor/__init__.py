"""braintumor: train, evaluate, explain and serve classifiers of 2-D brain MRI slices.

Research use only. Not a medical device; no clinical validity is claimed.
"""

__version__ = "0.1.0"

RESEARCH_NOTE = "Research use only: not a medical device, no clinical validity is claimed."
