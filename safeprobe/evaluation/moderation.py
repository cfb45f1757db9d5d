def train_moderation_judge(*a, **k): raise NotImplementedError
