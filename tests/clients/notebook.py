"""The Predibase notebook, start to finish, against a local loraserve: the real SDK, unchanged but
for PREDIBASE_GATEWAY. Records what the SDK returned, printed or raised, as JSON after a marker;
tests/test_control_notebook.py asserts. Runs in the clients environment (.venv-clients).

    PREDIBASE_GATEWAY=http://127.0.0.1:PORT .venv-clients/bin/python tests/clients/notebook.py URL KEY DATA_DIR
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
from predibase import Predibase, SFTConfig
from predibase.beta.config import BatchInferenceServerConfig
from recording import error_of

REPO = "records"


def wait_for(get, done, timeout: float = 300.0, period: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = get()
        if done(value):
            return value
        time.sleep(period)
    raise TimeoutError("gave up waiting")


def generate(client, prompt: str, adapter_id: str | None) -> dict:
    kw = {"adapter_id": adapter_id} if adapter_id else {}
    response = client.generate(prompt, max_new_tokens=24, details=True, **kw)
    return {"text": response.generated_text, "token_ids": [t.id for t in response.details.tokens]}


def train(pb: Predibase, data: Path, config: dict) -> dict:
    """repos.create twice, both dataset uploads, then the blocking adapters.create with its output."""
    repo = pb.repos.create(name=REPO, description="records in a fixed format", exists_ok=True)
    again = pb.repos.create(name=REPO, exists_ok=True)
    dataset = pb.datasets.from_file(str(data / "train.jsonl"), name="records_train")
    frame = pd.read_json(data / "train.jsonl", lines=True)
    from_frame = pb.datasets.from_pandas_dataframe(frame, name="records_frame")
    adapter = pb.adapters.create(config=SFTConfig(**config), dataset=dataset, repo=repo,
                                 description="first fine-tune")  # prints the SDK's progress to stdout
    return {"repo_uuid": repo.uuid, "repo_again_uuid": again.uuid, "dataset": dataset.name,
            "dataset_status": dataset.status, "frame_dataset": from_frame.name, "frame_status": from_frame.status,
            "adapter": {"repo": adapter.repo, "tag": adapter.tag, "path": adapter.artifact_path,
                        "base_model": adapter.base_model},
            }


def cancel_a_job(pb: Predibase, config: dict) -> dict:
    job = pb.finetuning.jobs.create(config=SFTConfig(**{**config, "epochs": 50}), dataset="records_frame",
                                    repo=REPO, watch=False)
    wait_for(lambda: pb.finetuning.jobs.get(job.uuid).status, lambda s: s == "training")
    pb.finetuning.jobs.cancel(job.uuid)
    final = wait_for(lambda: pb.finetuning.jobs.get(job.uuid).status, lambda s: s in ("canceled", "errored"))
    return {"tag": job.target_version_tag, "status_after_create": job.status, "final": final,
            "get_error": error_of(lambda: pb.adapters.get(f"{REPO}/{job.target_version_tag}"))}


def round_trip(pb: Predibase, client, work: Path, prompt: str, adapter_id: str) -> dict:
    """download the trained adapter, upload it as another repo's version, serve it, archive, delete."""
    zip_path = work / "trained.zip"
    pb.adapters.download(adapter_id, dest=str(zip_path))
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        archive.extractall(work / "unzipped")
    pb.repos.create(name="copied", exists_ok=True)
    uploaded = pb.adapters.upload(str(work / "unzipped"), "copied")
    copied_id = f"copied/{uploaded.tag}"
    out = {"zip_names": sorted(names), "uploaded_tag": uploaded.tag,
           "copied_output": generate(client, prompt, copied_id)}
    pb.adapters.archive(copied_id)
    out["versions_archived"] = [v.tag for v in pb.repos.get("copied").versions]
    pb.adapters.unarchive(copied_id)
    out["versions_unarchived"] = [v.tag for v in pb.repos.get("copied").versions]
    pb.adapters.delete(copied_id)
    out["after_delete"] = error_of(lambda: generate(client, prompt, copied_id))
    return out


def batch(pb: Predibase, data: Path, served: str, work: Path) -> dict:
    pb.datasets.from_file(str(data / "batch.jsonl"), name="records_batch")
    job = pb.beta.batch_inference.create(dataset="records_batch",
                                         server_config=BatchInferenceServerConfig(base_model=served))
    final = wait_for(lambda: pb.beta.batch_inference.get(job.uuid).status,
                     lambda s: s in ("completed", "errored", "canceled"))
    dest = work / "results.jsonl"
    pb.beta.batch_inference.download_results(job.uuid, dest=str(dest))
    rows = [json.loads(line) for line in dest.read_text().splitlines() if line.strip()]
    listed = [j.uuid for j in pb.beta.batch_inference.list()]
    return {"status_after_create": job.status, "final": final, "rows": rows, "listed": job.uuid in listed}


def main() -> None:
    url, key, data = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    spec = json.loads((data / "spec.json").read_text())
    pb = Predibase(api_token=key)
    client = pb.deployments.client("default", serving_url_override=url)
    report: dict = {"train": train(pb, data, spec["config"])}
    adapter_id = f"{REPO}/{report['train']['adapter']['tag']}"
    report["heldout"] = [{"prompt": p, "adapter": generate(client, p, adapter_id), "base": generate(client, p, None)}
                         for p in spec["heldout_prompts"]]
    report["cancel"] = cancel_a_job(pb, spec["config"])
    report["round_trip"] = round_trip(pb, client, data, spec["heldout_prompts"][0], adapter_id)
    report["batch"] = batch(pb, data, spec["served"], data)
    report["wrong_base"] = error_of(lambda: pb.finetuning.jobs.create(
        config=SFTConfig(**{**spec["config"], "base_model": "meta-llama/Llama-3.1-8B"}), dataset="records_train",
        repo=REPO, watch=False))
    print("@@REPORT@@" + json.dumps(report))


if __name__ == "__main__":
    main()
