"""Drives a running loraserve's control plane with the real Predibase SDK and prints what it saw, as JSON.

Runs in the clients environment (.venv-clients); tests/test_control_resources.py asserts.

    .venv-clients/bin/python tests/clients/control_sdk_checks.py URL API_KEY ADAPTER_DIR FOREIGN_BASE WORKDIR
"""

from __future__ import annotations

import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

from recording import error_of


def repo_checks(pb) -> dict:
    first = pb.repos.create(name="sdk-repo", description="made by the SDK", exists_ok=True)
    again = pb.repos.create(name="sdk-repo", exists_ok=True)
    return {"first_uuid": first.uuid, "again_uuid": again.uuid, "description": again.description,
            "duplicate": error_of(lambda: pb.repos.create(name="sdk-repo")),
            "by_uuid": pb.repos.get(first.uuid).name,
            "listed": [r.name for r in pb.repos.list(limit=50)]}


def dataset_checks(pb, workdir: Path) -> dict:
    import pandas as pd

    jsonl = workdir / "qa.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": f"A{i}."}) + "\n" for i in range(5)))
    from_file = pb.datasets.from_file(str(jsonl), name="qa")
    frame = pd.DataFrame({"prompt": ["hi", "bye"], "completion": ["hello", "goodbye"]})
    from_frame = pb.datasets.from_pandas_dataframe(frame, name="frame")
    got = pb.datasets.get("file_uploads/qa")
    pb.datasets.download(from_file, dest=str(workdir / "copy"))
    bad = workdir / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{not json\n')
    return {"from_file": [from_file.name, from_file.status, from_file.connection_name],
            "from_frame": [from_frame.name, from_frame.status],
            "get_uuid_matches": got.uuid == from_file.uuid,
            "downloaded_equal": (workdir / "copy.jsonl").read_bytes() == jsonl.read_bytes(),
            "bad": error_of(lambda: pb.datasets.from_file(str(bad), name="bad")),
            "duplicate": error_of(lambda: pb.datasets.from_file(str(jsonl), name="qa"))}


def adapter_checks(pb, url: str, adapter_dir: str, workdir: Path) -> dict:
    client = pb.deployments.client("default", serving_url_override=url)
    prompt = "What is machine learning?"
    uploaded = pb.adapters.upload(adapter_dir, repo="sdk-repo")
    adapter_id = f"{uploaded.repo}/{uploaded.tag}"
    out = {"uploaded": {"id": adapter_id, "path": uploaded.artifact_path, "base": uploaded.base_model},
           "base_text": client.generate(prompt, max_new_tokens=16).generated_text,
           "adapter_text": client.generate(prompt, max_new_tokens=16, adapter_id=adapter_id).generated_text}
    got = pb.adapters.get(adapter_id)
    out["get"] = {"tag": got.tag, "archived": got.archived, "path": got.artifact_path}
    pb.adapters.download(adapter_id, dest=str(workdir / "adapter.zip"))
    out["zip_names"] = sorted(zipfile.ZipFile(workdir / "adapter.zip").namelist())
    pb.adapters.archive(adapter_id)
    out["versions_archived"] = [v.tag for v in pb.repos.get("sdk-repo").versions]
    out["archived_text"] = client.generate(prompt, max_new_tokens=16, adapter_id=adapter_id).generated_text
    pb.adapters.unarchive(adapter_id)
    out["versions_unarchived"] = [v.tag for v in pb.repos.get("sdk-repo").versions]
    pb.adapters.delete(adapter_id)
    out["after_delete"] = error_of(lambda: client.generate(prompt, max_new_tokens=4, adapter_id=adapter_id))
    out["get_deleted"] = error_of(lambda: pb.adapters.get(adapter_id))
    second = pb.adapters.upload(adapter_dir, repo="sdk-repo")
    out["second_tag"] = second.tag
    return out


def deployment_checks(pb, foreign_base: str) -> dict:
    from predibase import DeploymentConfig

    served = pb.deployments.get("default").model
    listed = [d.name for d in pb.deployments.list()]
    made = pb.deployments.create(name="sdk-alias", config=DeploymentConfig(base_model=served.upper()))
    out = {"served": served, "listed": listed, "created": getattr(made, "name", None),
           "get_alias": pb.deployments.get("sdk-alias").name,
           "other_base": error_of(lambda: pb.deployments.create(name="other", config=DeploymentConfig(
               base_model=foreign_base))),
           "delete_configured": error_of(lambda: pb.deployments.delete("default"))}
    out["listed_after_create"] = [d.name for d in pb.deployments.list()]
    pb.deployments.delete("sdk-alias")
    out["get_deleted"] = error_of(lambda: pb.deployments.get("sdk-alias"))
    return out


def main() -> None:
    url, api_key, adapter_dir, foreign_base, workdir = sys.argv[1:6]
    os.environ["PREDIBASE_GATEWAY"] = url
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from predibase import Predibase

        pb = Predibase(api_token=api_key)
    work = Path(workdir)
    report = {"warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
              "repos": repo_checks(pb), "datasets": dataset_checks(pb, work),
              "adapters": adapter_checks(pb, url, adapter_dir, work),
              "deployments": deployment_checks(pb, foreign_base)}
    print("@@REPORT@@" + json.dumps(report))


if __name__ == "__main__":
    main()
