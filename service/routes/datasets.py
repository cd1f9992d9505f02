"""/v1/datasets: upload, list, delete. Workers on any host read the content from the database."""

from __future__ import annotations

import asyncio
import functools
import multiprocessing
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Annotated

import anyio.to_thread
from fastapi import APIRouter, Form, Request, Response, UploadFile, status
from pydantic import BaseModel, Field
from sqlalchemy import select

from caviar.db.tables import OPEN_STATUSES, Search, StoredDataset
from caviar.search.spec import text_problem
from caviar.service.deps import Owner, SessionDep, SettingsDep
from caviar.service.errors import Conflict, NotFound, TooMany
from caviar.service.schemas import DatasetList, DatasetPublic, error_responses
from caviar.service.uploads import ParsedUpload, UploadError, UploadLimits, parse_upload

router = APIRouter(
    prefix="/v1/datasets", tags=["datasets"], responses=error_responses(401, 422, 503)
)


class DatasetUpload(BaseModel):
    """A multipart dataset upload."""

    file: UploadFile = Field(description="A .npz (arrays x, y, optional splits) or .csv file.")
    target: str | None = Field(None, description="Target column of a .csv file.")


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    responses=error_responses(400, 413, 415, 429),
)
async def upload_dataset(
    owner: Owner,
    session: SessionDep,
    settings: SettingsDep,
    upload: Annotated[DatasetUpload, Form(media_type="multipart/form-data")],
    request: Request,
) -> DatasetPublic:
    """Upload a dataset; name it in a spec as `dataset: {id: <id>}`.

    The file is parsed in a child process, one upload at a time: parsing holds the GIL for
    seconds and takes several times the file's size in memory, which the API must not. An owner
    has one upload parsed at a time (429 for another meanwhile), so that no owner can queue
    uploads ahead of everyone else's.
    """
    limits = UploadLimits(
        max_bytes=settings.max_upload_bytes,
        max_array_bytes=settings.max_upload_array_bytes,
        max_columns=settings.max_upload_columns,
    )
    file = upload.file
    uploading: set[str] = request.app.state.uploading
    if owner in uploading:
        detail = "an upload of yours is still being parsed: send the next one when it is done"
        raise TooMany(detail)
    uploading.add(owner)
    try:
        content = await file.read(limits.max_bytes + 1)
        async with request.app.state.upload_parsing:
            parsed = await _parse_apart(file.filename or "", content, upload.target, limits)
    finally:
        uploading.discard(owner)
    row = StoredDataset(
        id=f"ds-{uuid.uuid4().hex[:12]}",
        owner=owner,
        name=file.filename or "upload",
        format=parsed.format,
        target=parsed.target,
        rows=parsed.rows,
        columns=parsed.columns,
        outputs=parsed.outputs,
        classes=parsed.classes,
        labels=parsed.labels,
        size=parsed.size,
        sha256=parsed.sha256,
        content=content,
    )
    session.add(row)
    await anyio.to_thread.run_sync(session.flush)  # sends the whole file to the database
    return DatasetPublic.model_validate(row)


#: Parser processes are forked from a server that has imported the parser (started on first use).
_PARSERS = multiprocessing.get_context("forkserver")
_PARSERS.set_forkserver_preload(["caviar.service.uploads"])


async def _parse_apart(
    filename: str, content: bytes, target: str | None, limits: UploadLimits
) -> ParsedUpload:
    """`parse_upload` in a process of its own, which exits when done (and gives its memory back);
    an UploadError there is raised here."""
    parser = ProcessPoolExecutor(1, mp_context=_PARSERS)
    call = functools.partial(parse_upload, filename, content, target=target, limits=limits)
    try:
        # Submitting starts the process (the first time, its server too): not on the loop.
        return await asyncio.wrap_future(await anyio.to_thread.run_sync(parser.submit, call))
    except BrokenProcessPool:  # the parser died, e.g. killed for its memory
        raise UploadError(413, "the upload is too large to parse on this server") from None
    finally:
        parser.shutdown(wait=False, cancel_futures=True)


@router.get("", response_model=DatasetList)
def list_datasets(owner: Owner, session: SessionDep) -> DatasetList:
    """The caller's datasets, newest first."""
    rows = session.scalars(
        select(StoredDataset)
        .where(StoredDataset.owner == owner)
        .order_by(StoredDataset.created_at.desc())
    )
    return DatasetList(items=[DatasetPublic.model_validate(row) for row in rows])


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses=error_responses(404, 409),
)
def delete_dataset(dataset_id: str, owner: Owner, session: SessionDep) -> Response:
    """Delete a dataset that no queued or running search uses (409 otherwise)."""
    row = session.get(StoredDataset, dataset_id) if text_problem(dataset_id) is None else None
    if row is None or row.owner != owner:
        raise NotFound(f"dataset {dataset_id!r} not found")
    open_searches = session.scalars(
        select(Search).where(Search.owner == owner, Search.status.in_(OPEN_STATUSES))
    )
    if any(s.spec.get("dataset", {}).get("id") == dataset_id for s in open_searches):
        raise Conflict("a queued or running search uses it")
    session.delete(row)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
