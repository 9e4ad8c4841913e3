"""Training the embedded shapes-world teacher (VAE, latents, text encoder + two experts) and
measuring its prompt adherence with the oracle."""

from distill.teacher_training.evaluate import evaluate_teacher
from distill.teacher_training.run import train_teacher
from distill.teacher_training.settings import TeacherTrainingConfig, load_training_config

__all__ = ["TeacherTrainingConfig", "evaluate_teacher", "load_training_config", "train_teacher"]
