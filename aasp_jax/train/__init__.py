"""Training: the AaSP objective's model bundle, optimizer and EMA schedules, state and the train step."""
