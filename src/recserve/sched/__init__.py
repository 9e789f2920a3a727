"""DeepRecSched: the scheduling policy, and (to come) its executor and tuner."""
