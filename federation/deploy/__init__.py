"""Deployment: the consortium's keys and certificates (provisioning), the SuperLink process and the
Flower app definition that `flwr run` submits."""
