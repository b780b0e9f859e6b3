"""Being built."""

from fastapi import APIRouter

router = APIRouter()
