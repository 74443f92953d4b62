"""xDS both ways: the agent's client (resources -> ServiceTable) and the controller's server
(ServiceTable -> resources), with the translation between them."""
