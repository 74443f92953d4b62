"""Resources in the shapes real control planes send, built from their published formats
(not captured): the tests' fixtures and `accel bench xds --shape`'s loads."""
