API_VERSION: int

def set_gear(table: list[int]) -> None: ...
def cut_points(
    data: bytes | bytearray | memoryview,
    min_size: int,
    avg_size: int,
    max_size: int,
    mask_s: int,
    mask_l: int,
    eof: bool,
) -> list[int]: ...
