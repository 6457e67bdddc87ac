"""The desired state: the keeper that writes it, and the view both it and catch-up use."""
