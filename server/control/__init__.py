"""The control plane of the seed API (repos, datasets, fine-tuning, deployments, batch inference),
as the Predibase SDK calls it. It reaches the engine only through the calls the HTTP routes use;
training runs in its own process and never imports the engine."""
