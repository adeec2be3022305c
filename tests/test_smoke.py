import pyarrow.flight as flight

from tests.harness import Server, call_options


def test_demo_agent_lists_and_reads(server: Server) -> None:
    client = server.flight()
    opts = call_options(server.demo_token)
    names = sorted(
        ".".join(p.decode() for p in fi.descriptor.path) for fi in client.list_flights(options=opts)
    )
    assert names == ["demo.customers", "demo.events", "demo.orders"]
    info = client.get_flight_info(flight.FlightDescriptor.for_path("demo", "customers"), opts)
    table = client.do_get(info.endpoints[0].ticket, opts).read_all()
    assert table.num_rows == 1000
