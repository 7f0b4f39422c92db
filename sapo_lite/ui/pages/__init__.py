"""The dashboard's pages, one module each: `runs` (states and curves), `pairs` (the replay buffer), `chat` (the
roles side by side) and `control` (launch, stop, resume, export). Each exports ROUTES."""
