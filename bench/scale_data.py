"""A synthetic province archive, as rows for PostgreSQL COPY: the generator behind ``bench.index_scale``.

Deterministic for a seed. The shape follows a provincial network rather than a uniform grid:

- ~10 facilities (the provincial hospital takes the largest share), each patient belongs to one (the
  facility is part of a patient record's identity, ``uq_patient_identity``) and every study is of its
  patient's facility;
- the study mix of such an archive: CR/DX (1–2 images), US (3–12), MG (4), CT (a scout and an axial series
  of 10–60 slices, 1 in 20 with a thin-slice series of 150–300) and MR (3–5 series of 10–25): ~12 instances per
  study on average, so 10^7 instances are ~800,000 studies of ~400,000 patients;
- Vietnamese names with the family names' real frequencies (Nguyễn ~38 %), stored as modalities send them:
  7 in 10 with diacritics (``Nguyễn^Văn An``), the others upper-case ASCII (``NGUYEN^VAN AN``); the index's
  folded column (``patient_name_search``) through the project's own :func:`pacs.text.fold`;
- ten years of study dates in arrival order (an archive fills day after day), accession numbers per facility,
  UIDs as long as real ones (~45–60 characters);
- the RIS side the reading list reads: every study older than two weeks has a signed report (1 in 200 is
  forgotten), 60 % of the last two weeks' studies wait; orders (2 % STAT, 8 % URGENT) for 70 % of the last
  two years' studies; drafts and claims on some waiting studies.

:func:`generate` yields :class:`Chunk` objects (one COPY text buffer per table) every ``chunk_studies``
studies, so memory stays flat whatever the size. The total number of instances is exactly what was asked
(the last study is cut short).
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from pacs.text import fold

ROOT = "1.2.826.0.1.3680043.10.543.17"  # synthetic UIDs under one root
END = date(2026, 12, 6)  # the last study date; the archive spans ten years before it
YEARS = 10
MEAN_INSTANCES_PER_STUDY = 12.4  # of the mix below (measured over 10^6 generated instances)

FACILITIES = [("BVT", "Bệnh viện Đa khoa Tỉnh", 30), ("BVS", "Bệnh viện Sản Nhi", 12),
              ("BVY", "Bệnh viện Y học cổ truyền", 4), ("TTH1", "Trung tâm Y tế huyện Hòa Vang", 8),
              ("TTH2", "Trung tâm Y tế huyện Phú Ninh", 8), ("TTH3", "Trung tâm Y tế huyện Thăng Bình", 8),
              ("TTH4", "Trung tâm Y tế huyện Núi Thành", 8), ("TTH5", "Trung tâm Y tế huyện Đại Lộc", 8),
              ("TTH6", "Trung tâm Y tế thị xã Điện Bàn", 8), ("PKQ", "Phòng khám Đa khoa Quốc tế", 6)]
FACILITY_CODES = [code for code, _, _ in FACILITIES]

FAMILY = [("Nguyễn", 380), ("Trần", 110), ("Lê", 95), ("Phạm", 70), ("Hoàng", 51), ("Huỳnh", 50), ("Phan", 45),
          ("Vũ", 39), ("Võ", 39), ("Đặng", 21), ("Bùi", 20), ("Đỗ", 14), ("Hồ", 13), ("Ngô", 13), ("Dương", 10),
          ("Lý", 5), ("Đinh", 5), ("Trương", 5), ("Lương", 4), ("Mai", 3)]
MIDDLE_M = ["Văn", "Hữu", "Đức", "Minh", "Quốc", "Công", "Thanh", "Xuân", "Đình", "Ngọc", "Trọng", "Anh"]
MIDDLE_F = ["Thị", "Thị", "Thị", "Ngọc", "Thu", "Thanh", "Kim", "Minh", "Bích", "Mỹ", "Hồng", "Phương"]
GIVEN_M = ["An", "Bình", "Cường", "Dũng", "Đạt", "Hải", "Hiếu", "Hòa", "Hùng", "Huy", "Khánh", "Khoa", "Kiên",
           "Long", "Lộc", "Minh", "Nam", "Nghĩa", "Phong", "Phúc", "Quang", "Sơn", "Tài", "Tâm", "Thắng",
           "Thành", "Toàn", "Trung", "Tuấn", "Vinh", "Việt", "Vũ"]
GIVEN_F = ["Anh", "Châu", "Chi", "Dung", "Duyên", "Giang", "Hà", "Hạnh", "Hằng", "Hiền", "Hoa", "Hương",
           "Huyền", "Lan", "Liên", "Linh", "Loan", "Mai", "My", "Nga", "Ngân", "Nhung", "Oanh", "Phương",
           "Quyên", "Thảo", "Thu", "Thủy", "Trang", "Trinh", "Uyên", "Yến"]

STUDY_MIX = [("CR", 45), ("DX", 14), ("US", 17), ("MG", 5), ("CT", 14), ("MR", 5)]
SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
             "US": "1.2.840.10008.5.1.4.1.1.6.1", "MG": "1.2.840.10008.5.1.4.1.1.1.2",
             "CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
PIXELS = {"CR": (2500, 2048), "DX": (3000, 2500), "US": (600, 800), "MG": (4096, 3328), "CT": (512, 512),
          "MR": (256, 256)}
SIZE = {"CR": 10_300_000, "DX": 15_000_000, "US": 960_000, "MG": 27_000_000, "CT": 525_000, "MR": 131_000}
DESCRIPTION = {"CR": ["X-quang ngực thẳng", "X-quang cột sống thắt lưng", "X-quang khớp gối"],
               "DX": ["X-quang ngực kỹ thuật số", "X-quang xương chậu"],
               "US": ["Siêu âm ổ bụng", "Siêu âm tuyến giáp", "Siêu âm thai"],
               "MG": ["Chụp nhũ ảnh hai bên"],
               "CT": ["CT sọ não không cản quang", "CT ngực", "CT bụng có cản quang"],
               "MR": ["MRI sọ não", "MRI cột sống cổ"]}
BODY_PART = {"CR": "CHEST", "DX": "CHEST", "US": "ABDOMEN", "MG": "BREAST", "CT": "HEAD", "MR": "BRAIN"}
TRANSFER = "1.2.840.10008.1.2.1"
RADIOLOGISTS = [f"rad-{n}" for n in range(1, 9)]

PATIENT_COLUMNS = ["id", "patient_id", "issuer_of_patient_id", "facility", "patient_name", "patient_name_search",
                   "patient_birth_date", "patient_sex", "created_at", "national_ids"]
STUDY_COLUMNS = ["id", "study_instance_uid", "patient_fk", "study_date", "study_time", "accession_number",
                 "study_id", "study_description", "study_description_search", "referring_physician_name",
                 "institution_name", "facility", "provisional", "modalities_in_study", "number_of_series",
                 "number_of_instances", "specific_character_set", "thumbnail_key", "created_at", "updated_at"]
SERIES_COLUMNS = ["id", "series_instance_uid", "study_fk", "modality", "series_number", "series_description",
                  "body_part_examined", "series_date", "series_time", "station_name", "number_of_instances",
                  "thumbnail_key", "metadata_key", "created_at"]
INSTANCE_COLUMNS = ["id", "sop_instance_uid", "series_fk", "sop_class_uid", "instance_number",
                    "transfer_syntax_uid", "rows", "columns", "number_of_frames", "object_key", "size", "sha256",
                    "received_at", "source", "source_ae", "source_address", "version", "thumbnail_key"]
ORDER_COLUMNS = ["accession_number", "study_instance_uid", "patient_id", "patient_name", "patient_name_search",
                 "patient_birth_date", "patient_sex", "requested_procedure_id", "requested_procedure_description",
                 "scheduled_procedure_step_id", "scheduled_station_ae_title", "scheduled_start_date",
                 "scheduled_start_time", "modality", "scheduled_performing_physician_name",
                 "scheduled_performing_physician_name_search", "referring_physician_name", "state", "priority",
                 "priority_rank", "reason", "facility", "issuer_of_patient_id", "placer_order_number", "source",
                 "linked_study_instance_uid"]
REPORT_COLUMNS = ["id", "study_instance_uid", "patient_id", "facility", "accession_number", "status",
                  "current_version", "created_by"]
VERSION_COLUMNS = ["report_fk", "version", "status", "findings", "impression", "language", "author", "author_name",
                   "amend_reason", "preliminary_at", "signed_by", "signed_by_name", "sr_sop_instance_uid"]
CLAIM_COLUMNS = ["study_instance_uid", "claimed_by"]

#: COPY order: parents before children (the foreign keys may be in place while loading)
TABLES: list[tuple[str, list[str]]] = [
    ("patient", PATIENT_COLUMNS), ("study", STUDY_COLUMNS), ("series", SERIES_COLUMNS),
    ("instance", INSTANCE_COLUMNS), ("imaging_order", ORDER_COLUMNS), ("report", REPORT_COLUMNS),
    ("report_version", VERSION_COLUMNS), ("study_claim", CLAIM_COLUMNS)]
PRIORITY_RANK = {"STAT": 0, "URGENT": 1, "ROUTINE": 2}


@dataclass
class Chunk:
    """COPY text (tab-separated, ``\\N`` for NULL) per table, and how many rows each holds."""

    buffers: dict[str, io.StringIO] = field(default_factory=lambda: {t: io.StringIO() for t, _ in TABLES})
    rows: dict[str, int] = field(default_factory=lambda: {t: 0 for t, _ in TABLES})

    def add(self, table: str, line: str) -> None:
        self.buffers[table].write(line)
        self.rows[table] += 1


@dataclass
class Totals:
    rows: dict[str, int] = field(default_factory=lambda: {t: 0 for t, _ in TABLES})
    modalities: dict[str, int] = field(default_factory=dict)
    waiting: int = 0  # studies with no signed report (the reading list's total, unscoped)

    def add(self, chunk: Chunk) -> None:
        for table, n in chunk.rows.items():
            self.rows[table] += n


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\t", " ").replace("\n", " ")


def patient_count(instances: int) -> int:
    return max(1, round(instances / MEAN_INSTANCES_PER_STUDY / 2))


def patient_name(rnd: random.Random, families: list[str], family_weights: list[int]) -> tuple[str, str]:
    """(name as stored, sex): ``Nguyễn^Văn An`` or, from modalities without Unicode, ``NGUYEN^VAN AN``."""
    sex = rnd.choice("MF")
    family = rnd.choices(families, family_weights)[0]
    middle = rnd.choice(MIDDLE_M if sex == "M" else MIDDLE_F)
    given = rnd.choice(GIVEN_M if sex == "M" else GIVEN_F)
    name = f"{family}^{middle} {given}"
    return (name if rnd.random() < 0.7 else fold(name)), sex


def series_plan(rnd: random.Random, modality: str) -> list[int]:
    """Instances per series of one study of ``modality``."""
    if modality == "CR":
        return [1 if rnd.random() < 0.7 else 2]
    if modality == "DX":
        return [1] * rnd.randint(1, 2)
    if modality == "US":
        return [rnd.randint(3, 12)]
    if modality == "MG":
        return [4]
    if modality == "CT":
        plan = [rnd.randint(1, 2), rnd.randint(10, 60)]
        if rnd.random() < 0.05:
            plan.append(rnd.randint(150, 300))
        return plan
    return [rnd.randint(10, 25) for _ in range(rnd.randint(3, 5))]


def generate(instances: int, seed: int = 17, chunk_studies: int = 5000, totals: Totals | None = None
             ) -> Iterator[Chunk]:
    """Yield the archive's rows in chunks; ``totals`` (if given) counts what was yielded."""
    rnd = random.Random(seed)
    families = [f for f, _ in FAMILY]
    family_weights = [w for _, w in FAMILY]
    fac_weights = [w for _, _, w in FACILITIES]
    institution = {code: name for code, name, _ in FACILITIES}
    patients = patient_count(instances)
    est_studies = max(1, round(instances / MEAN_INSTANCES_PER_STUDY))
    start = END - timedelta(days=365 * YEARS)
    span = (END - start).days
    two_weeks = END - timedelta(days=14)
    two_years = END - timedelta(days=730)
    mix = [m for m, _ in STUDY_MIX]
    mix_weights = [w for _, w in STUDY_MIX]

    chunk = Chunk()
    # patients: (patient_id, facility, name, folded name, birth date, sex) kept for the studies and orders
    pinfo: list[tuple[str, str, str, str, str]] = [("", "", "", "", "")]
    seq_per_fac = dict.fromkeys(FACILITY_CODES, 0)
    created = datetime.combine(start, datetime.min.time(), UTC).isoformat()
    for p in range(1, patients + 1):
        fac = rnd.choices(FACILITY_CODES, fac_weights)[0]
        seq_per_fac[fac] += 1
        pid = f"{fac}{seq_per_fac[fac]:07d}"
        name, sex = patient_name(rnd, families, family_weights)
        born = (date(1930, 1, 1) + timedelta(days=rnd.randrange(33000))).strftime("%Y%m%d")
        folded = fold(name)
        pinfo.append((pid, fac, name, born, sex))
        chunk.add("patient", f"{p}\t{pid}\t\t{fac}\t{_esc(name)}\t{_esc(folded)}\t{born}\t{sex}\t{created}\t\n")
    totals = totals if totals is not None else Totals()
    acc_seq = dict.fromkeys(FACILITY_CODES, 0)
    study = series_id = inst_id = report_id = 0
    while inst_id < instances:
        study += 1
        p = rnd.randrange(1, patients + 1)
        pid, fac, name, born, sex = pinfo[p]
        day = start + timedelta(days=min(span, int(study / est_studies * span) + rnd.randint(-1, 1)))
        ymd = day.strftime("%Y%m%d")
        hh, mm, ss = rnd.randint(7, 19), rnd.randrange(60), rnd.randrange(60)
        stamp = f"{day.isoformat()}T{hh:02d}:{mm:02d}:{ss:02d}+00:00"
        modality = rnd.choices(mix, mix_weights)[0]
        totals.modalities[modality] = totals.modalities.get(modality, 0) + 1
        plan = series_plan(rnd, modality)
        left = instances - inst_id
        cut: list[int] = []
        for n in plan:  # the last study is cut so that the total is exact
            if left <= 0:
                break
            cut.append(min(n, left))
            left -= cut[-1]
        plan = cut
        acc_seq[fac] += 1
        accession = f"{fac}{day:%y}{acc_seq[fac]:07d}"
        study_uid = f"{ROOT}.1.{ymd}.{study}"
        description = rnd.choice(DESCRIPTION[modality])
        rows, cols = PIXELS[modality]
        chunk.add("study", (
            f"{study}\t{study_uid}\t{p}\t{ymd}\t{hh:02d}{mm:02d}{ss:02d}\t{accession}\t{study % 100000}"
            f"\t{description}\t{fold(description)}\tBS^Referring\t{institution[fac]}\t{fac}\tf\t{modality}"
            f"\t{len(plan)}\t{sum(plan)}\tISO_IR 192\t\\N\t{stamp}\t{stamp}\n"))
        for k, count in enumerate(plan, start=1):
            series_id += 1
            series_uid = f"{study_uid}.{k}"
            chunk.add("series", (
                f"{series_id}\t{series_uid}\t{study}\t{modality}\t{k}\t{description} {k}\t{BODY_PART[modality]}"
                f"\t{ymd}\t{hh:02d}{mm:02d}{ss:02d}\t{fac}-{modality}1\t{count}\t\\N\t\\N\t{stamp}\n"))
            for i in range(1, count + 1):
                inst_id += 1
                sop = f"{series_uid}.{i}"
                sha = f"{inst_id * 2654435761 % (1 << 64):016x}" * 4
                chunk.add("instance", (
                    f"{inst_id}\t{sop}\t{series_id}\t{SOP_CLASS[modality]}\t{i}\t{TRANSFER}\t{rows}\t{cols}\t\\N"
                    f"\tdicom/{study_uid}/{series_uid}/{sop}/{sha}.dcm\t{SIZE[modality]}\t{sha}\t{stamp}\tdimse"
                    f"\t{fac}-{modality}1\t10.0.0.{study % 250 + 1}\t1\t\\N\n"))
        recent = day > two_weeks
        signed = rnd.random() >= 0.6 if recent else rnd.random() >= 0.005
        if day > two_years and rnd.random() < 0.7:
            priority = rnd.choices(["STAT", "URGENT", "ROUTINE"], weights=[2, 8, 90])[0]
            chunk.add("imaging_order", (
                f"{accession}\t{ROOT}.9.{study}\t{pid}\t{_esc(name)}\t{_esc(fold(name))}\t{born}\t{sex}\tRP{study}"
                f"\t{description}\tSPS{study}\t{fac}-{modality}1\t{ymd}\t{hh:02d}0000\t{modality}\t\t\t"
                f"BS^Referring\tcompleted\t{priority}\t{PRIORITY_RANK[priority]}\t\t{fac}\t\t{accession}\thl7"
                f"\t{study_uid}\n"))
        if signed or rnd.random() < 0.05:
            report_id += 1
            status = "final" if signed else "draft"
            chunk.add("report", f"{report_id}\t{study_uid}\t{pid}\t{fac}\t{accession}\t{status}\t1\tbench\n")
            chunk.add("report_version", (
                f"{report_id}\t1\t{status}\tKhông thấy bất thường.\tBình thường.\tvi\t{RADIOLOGISTS[study % 8]}"
                f"\tBS Chẩn đoán hình ảnh\t\t\\N\t{RADIOLOGISTS[study % 8] if signed else ''}\t\t\n"))
        if not signed:
            totals.waiting += 1
            if rnd.random() < 0.2:
                chunk.add("study_claim", f"{study_uid}\t{rnd.choice(RADIOLOGISTS)}\n")
        if study % chunk_studies == 0:
            totals.add(chunk)
            yield chunk
            chunk = Chunk()
    totals.add(chunk)
    yield chunk
