"""A small MaxMind-format city database for the tests (mmdb-writer, pinned in .ci/run).

    python3 tests/geoip_db.py OUT.mmdb

Writes an IPv6 database (IPv4 reachable through it, as in MaxMind's own) shaped like
GeoLite2-City, holding documentation ranges only:

    203.0.113.0/24   city Berlin, country DE
    198.51.100.0/24  country DE, no city
    2001:db8::/32    city Paris, country FR

Every other address (192.0.2.0/24 among them) is not in it.
"""

import sys

from mmdb_writer import MMDBWriter
from netaddr import IPSet


def main():
    out = sys.argv[1]
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-City",
        languages=["en", "de"],
        description="Latchkey test database",
    )
    writer.insert_network(
        IPSet(["203.0.113.0/24"]),
        {
            "city": {"geoname_id": 2950159, "names": {"en": "Berlin", "de": "Berlin"}},
            "country": {"geoname_id": 2921044, "iso_code": "DE", "names": {"en": "Germany"}},
        },
    )
    writer.insert_network(
        IPSet(["198.51.100.0/24"]),
        {"country": {"geoname_id": 2921044, "iso_code": "DE", "names": {"en": "Germany"}}},
    )
    writer.insert_network(
        IPSet(["2001:db8::/32"]),
        {
            "city": {"geoname_id": 2988507, "names": {"en": "Paris"}},
            "country": {"geoname_id": 3017382, "iso_code": "FR", "names": {"en": "France"}},
        },
    )
    writer.to_db_file(out)


if __name__ == "__main__":
    main()
