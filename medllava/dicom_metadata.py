"""What a DICOM header may contribute to the metadata returned with an image, and nothing more.

Guarantee: by default a header contributes only
- coded values (`CODED_KEYWORDS`), each kept only when it is a valid code string (PS3.5 6.2), one of
  the standard's defined terms where it lists them, and not a name or ID from the same header;
- numbers (`NUMERIC_KEYWORDS`), with anything holding text dropped;
- the transfer syntax and SOP class names and the `burned_in_annotation` flag.
Free text never passes by default, because sites type names, IDs and dates into any field a form
shows them; so no patient name, ID, date, address, institution, UID or private tag reaches a training
record. `StudyDescription` and `SeriesDescription` (`DESCRIPTION_KEYWORDS`) come only on request,
each word that may identify someone replaced by `REDACTED` (`clean_description`).

`medllava.dicom.load_dicom` calls `header_metadata` on the file it decodes and `burned_in_annotation`
to warn about or refuse files with identifiers drawn into the pixels.
"""

from __future__ import annotations

import numbers
import re
import unicodedata
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

# What the header may contribute to metadata by default: coded values and numbers only. Coded
# values must also be valid code strings (PS3.5 6.2: upper case, digits, space, underscore, at most
# 16 characters) and, where the standard lists them, one of its defined terms, because sites type
# free text (names included) into any field a form shows them.
CODED_KEYWORDS = (
    "Modality", "BodyPartExamined", "ViewPosition", "ImageLaterality", "Laterality", "PatientPosition",
    "ImageType", "PhotometricInterpretation", "RescaleType", "VOILUTFunction",
)
NUMERIC_KEYWORDS = (
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored",
    "PixelRepresentation", "PixelSpacing", "ImagerPixelSpacing", "SliceThickness", "SpacingBetweenSlices",
    "RescaleSlope", "RescaleIntercept", "WindowCenter", "WindowWidth",
)
METADATA_KEYWORDS = CODED_KEYWORDS + NUMERIC_KEYWORDS
_DEFINED_TERMS = {
    "ImageLaterality": {"R", "L", "U", "B"},
    "Laterality": {"R", "L"},
    "PatientPosition": {"HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS", "LFP", "LFS", "RFP", "RFS",
                        "AFDR", "AFDL", "PFDR", "PFDL"},
    "PhotometricInterpretation": {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "YBR_FULL",
                                  "YBR_FULL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB"},
    # PS3.3 C.11.1.1.2; RescaleType is LO, so anything else in it is free text.
    "RescaleType": {"OD", "HU", "US", "MGML", "Z_EFF", "ED", "EDW", "HU_MOD", "PCT"},
    "VOILUTFunction": {"LINEAR", "LINEAR_EXACT", "SIGMOID"},
}
_CODE_STRING = re.compile(r"[A-Z0-9 _]{1,16}")

# Free-text descriptions, returned only on request (`descriptions=True`) and then cleaned; see
# `clean_description`. PS3.15's Basic Profile removes them outright (action X).
DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription")
_IDENTIFYING_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
    "PatientBirthName", "PatientMotherBirthName", "PatientAddress", "PatientTelephoneNumbers",
    "AccessionNumber", "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName",
    "InstitutionName", "InstitutionAddress", "StudyID", "MedicalRecordLocator", "StudyDate",
    "SeriesDate", "AcquisitionDate", "ContentDate", "StationName", "IssuerOfPatientID",
)
REDACTED = "[removed]"
# Tokens with digits are dates, IDs or phone numbers unless they are one of these technical forms
# (5mm, 0.625mm, 120kV, T1, T2W, 3D, b1000).
_SAFE_DIGITS = re.compile(
    r"\d+(?:\.\d+)?(?:mm|cm|ml|kv|kvp|mas|ms|sec|mgy|mbq|mci|t)|t[12]w?|[234]d|b\d{1,4}|x\d", re.IGNORECASE
)
_MONTHS = frozenset(
    "january february march april may june july august september october november december "
    "jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_HONORIFICS = frozenset("dr doctor mr mrs ms miss prof professor mrn".split())


def header_metadata(ds: Dataset, descriptions: bool) -> dict[str, Any]:
    """Coded and numeric header values as plain JSON types, plus transfer syntax, SOP class and the
    burned-in annotation flag; cleaned descriptions too when `descriptions` is set."""
    meta: dict[str, Any] = {"transfer_syntax": UID(ds.file_meta.TransferSyntaxUID).name}
    sop = ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    if sop:
        meta["sop_class"] = UID(sop).name
    meta["burned_in_annotation"] = burned_in_annotation(ds)
    parts = identifier_parts(ds)
    for keyword in CODED_KEYWORDS:
        value = _coded(keyword, ds.get(keyword), parts)
        if value is not None:
            meta[keyword] = value
    for keyword in NUMERIC_KEYWORDS:
        value = _plain(ds[keyword].value) if keyword in ds else None
        if value is not None and not _has_str(value):
            meta[keyword] = value
    if descriptions:
        for keyword in DESCRIPTION_KEYWORDS:
            text = ds.get(keyword)
            if isinstance(text, str) and text.strip():
                meta[keyword] = clean_description(text, parts)
    return meta


def burned_in_annotation(ds: Dataset) -> bool | None:
    """True when the header says identifying text is burned into the pixels (BurnedInAnnotation
    YES), False when it says NO, None when it says nothing."""
    value = str(ds.get("BurnedInAnnotation") or "").strip().upper()
    return {"YES": True, "NO": False}.get(value)


def _coded(keyword: str, value: Any, parts: frozenset[str]) -> Any:
    """A code string (or list of them) that is valid, a defined term where the standard has a short
    list, and not an identifier from the header; else None."""
    values = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    kept = []
    for v in values:
        text = str(v if v is not None else "").strip()
        if not _CODE_STRING.fullmatch(text) or text not in _DEFINED_TERMS.get(keyword, {text}):
            continue
        if _identifies(text, parts):
            continue
        kept.append(text)
    if not kept:
        return None
    return kept if isinstance(value, (MultiValue, list, tuple)) else kept[0]


def _has_str(value: Any) -> bool:
    """A string, or a list holding one: text that a numeric keyword must not carry."""
    return isinstance(value, str) or (isinstance(value, list) and any(isinstance(v, str) for v in value))


def _norm(text: str) -> str:
    """Lower-case letters and digits only, accents dropped: "José" and "JOSE" compare equal."""
    return re.sub(r"[^0-9a-z]", "", unicodedata.normalize("NFKD", text).lower())


def identifier_parts(ds: Dataset) -> frozenset[str]:
    """Every identifying header value, lower-cased and stripped to letters and digits: whole, and
    split into its words (person names are family^given^middle^prefix^suffix; each may be typed alone,
    in any order or case)."""
    found: set[str] = set()
    for keyword in _IDENTIFYING_KEYWORDS:
        element = ds.get(keyword)
        values = element if isinstance(element, (list, MultiValue)) else [element]
        for value in values:
            text = str(value or "")
            found.add(_norm(text))
            for piece in re.split(r"[\s^]+", text):  # "Smith-Jones" whole, then "Smith" and "Jones"
                found.add(_norm(piece))
                found.update(_norm(word) for word in re.split(r"[,.\-/_'@]+", piece))
    # A lone initial identifies nobody, and would take every "L" (laterality) or "a" with it.
    return frozenset(part for part in found if len(part) >= 2)


def _matches_identifier(word: str, parts: frozenset[str]) -> bool:
    """`word` (one run of letters and digits, lower-cased) is an identifier from the header, or one
    of three or more characters with up to two initials stuck to it ("smithm", "jsmith", "marys").

    Words with more around the identifier are left alone, so a patient called Mary does not take
    "primary" with her, nor one called NG^AN "and" or "angio". Words split by punctuation
    ("SMITH,MARY", "m.smith@site") reach here one run at a time.
    """
    if word in parts:
        return True
    for extra in (1, 2):
        if len(word) - extra >= 3 and (word[extra:] in parts or word[:-extra] in parts):
            return True
    return False


def _identifies(word: str, parts: frozenset[str]) -> bool:
    """Any run of letters or digits in `word` (split at punctuation and at lower-to-upper case
    changes, as in "SmithM") is an identifier."""
    runs = re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|[0-9]+", word)
    return _matches_identifier(_norm(word), parts) or any(_matches_identifier(r.lower(), parts) for r in runs)


def clean_description(text: str, parts: frozenset[str]) -> str:
    """A free-text description with every word that may identify someone replaced by REDACTED.

    Follows the intent of PS3.15's Clean Descriptors Option (keep what the text says about the
    study, remove what identifies the patient), word by word; a word goes when it
    - is, or contains, an identifying value from the header (`identifier_parts`), in any case and
      spelled with any punctuation: "Mary Doe Smith", "SMITH,MARY", "msmith@site", "MRN-998877";
    - holds a digit, unless it is a technical quantity ("5mm", "120kV", "T2", "3D", "b1000"):
      dates in any format, IDs, accession and phone numbers;
    - is a month name, an e-mail address or URL, or follows a title ("Dr", "Mrs", "Prof", "MRN"),
      which catches names the header does not carry.
    What it cannot catch: a name or place the header does not hold, written without a title. That is
    why descriptions are off by default.
    """
    words = text.split()
    out = []
    after_title = False
    for word in words:
        key = _norm(word)
        unsafe = (
            after_title
            or _identifies(word, parts)
            or (any(c.isdigit() for c in word) and not _SAFE_DIGITS.fullmatch(word.strip(".,;:()[]")))
            or key in _MONTHS
            or "@" in word
            or "://" in word
            or word.lower().startswith("www.")
        )
        after_title = key in _HONORIFICS
        out.append(REDACTED if unsafe else word)
    return " ".join(out)


def _plain(value: Any) -> Any:
    """pydicom value -> str/int/float/list; empty values and anything else (bytes,
    sequences, person names) -> None."""
    if isinstance(value, (MultiValue, list, tuple)):
        items = [v for v in map(_plain, value) if v is not None]
        return items or None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, numbers.Real):  # DSfloat, and Decimal when pydicom is set to use it
        return float(value)
    if isinstance(value, str):
        return str(value) or None
    return None
