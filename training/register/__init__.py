"""Registration: the registry from the shell, and onboarding a new expert behind an evaluation gate."""
