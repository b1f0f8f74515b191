"""CSV files as spreadsheets write them: a UTF-8 byte-order mark before the header and spaces
around a seriesuid read as the plain file does."""

import numpy as np

from jaxmed.evaluation import submission
from jaxmed.scans import luna16

PLAIN = 'seriesuid,coordX,coordY,coordZ,class\n1.2.3,1.5,-2.0,3.25,1\n1.2.4,0,0,0,0\n'


def test_a_byte_order_mark_and_spaces_around_a_seriesuid_read_as_the_plain_file(tmp_path):
  plain, excel = tmp_path / 'plain.csv', tmp_path / 'excel.csv'
  plain.write_text(PLAIN)
  excel.write_bytes('\ufeff'.encode() + PLAIN.replace('1.2.3,', ' 1.2.3 ,').encode())
  want = luna16.read_csv(plain, luna16.CANDIDATE_COLUMNS)
  got = luna16.read_csv(excel, luna16.CANDIDATE_COLUMNS)
  assert got['seriesuid'].tolist() == ['1.2.3', '1.2.4']
  for name in luna16.CANDIDATE_COLUMNS:
    np.testing.assert_array_equal(got[name], want[name])


def test_a_seriesuids_file_with_a_byte_order_mark_skips_its_header(tmp_path):
  path = tmp_path / 'seriesuids.csv'
  path.write_bytes('\ufeffseriesuid\n1.2.3\n'.encode())
  assert submission.read_seriesuids(path).tolist() == ['1.2.3']
