"""Guest firmware: the Migration Handler (MH) and the launch image (to come, issue 4)."""
