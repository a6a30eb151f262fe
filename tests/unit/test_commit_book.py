"""The book of asynchronous offset commits (kafka/commits.py): its three rules, walked
without a broker."""

from __future__ import annotations

from girder_upload_stream.kafka.commits import CommitAnswer, CommitBook
from tests.unit.fakes import Clock

A, B = ("t", 0), ("t", 1)


def test_a_commit_is_sent_and_its_acceptance_reaches_the_caller_next_round():
    book = CommitBook(clock=Clock())
    send, accepted = book.to_send({A: (5, "m5")})
    assert send == {A: (5, "m5")} and accepted == {}
    book.sent(send)
    assert book.answered(None, [CommitAnswer(A, 5)], owned={A}) == []
    send, accepted = book.to_send({A: (5, "m5")})
    assert send == {} and accepted == {A: (5, "m5")}, "accepted, and not sent again"


def test_one_commit_waits_for_its_answer_before_the_next_is_sent_rule_1():
    clock = Clock()
    book = CommitBook(patience=30, clock=clock)
    book.sent(book.to_send({A: (5, "")})[0])
    assert book.to_send({A: (7, "")}) == ({}, {}), "the first is not answered yet"
    clock.now += 31  # librdkafka may have dropped it: the next one goes
    assert book.to_send({A: (7, "")})[0] == {A: (7, "")}


def test_an_offset_the_broker_has_is_never_sent_again_rule_2():
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, ""), B: (9, "")})[0])
    book.answered(None, [CommitAnswer(A, 5), CommitAnswer(B, 9)], owned={A, B})
    send, accepted = book.to_send({A: (5, ""), B: (12, "")})
    assert send == {B: (12, "")}
    assert accepted == {A: (5, ""), B: (9, "")}


def test_answers_after_a_rebalance_do_not_count_rule_3():
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, "")})[0])
    book.new_assignment([A])  # lost and assigned again meanwhile
    book.answered(None, [CommitAnswer(A, 5)], owned={A})
    assert book.to_send({A: (5, "")}) == ({A: (5, "")}, {}), "sent again, not believed"


def test_answers_for_partitions_not_owned_do_not_count():
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, ""), B: (6, "")})[0])
    book.answered(None, [CommitAnswer(A, 5), CommitAnswer(B, 6)], owned={B})
    assert book.to_send({})[1] == {B: (6, "")}


def test_failures_are_reported_and_the_offsets_sent_again():
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, ""), B: (6, "")})[0])
    problems = book.answered(None, [CommitAnswer(A, 5, "Broker: Not coordinator"),
                                    CommitAnswer(B, 6)], owned={A, B})
    assert problems == ["t[0]: Broker: Not coordinator"]
    assert book.to_send({A: (5, ""), B: (6, "")}) == ({A: (5, "")}, {B: (6, "")})
    book.sent({A: (5, "")})
    assert book.answered("Local: Waiting for coordinator", [], owned={A, B}) == [
        "Local: Waiting for coordinator"]
    assert book.to_send({A: (5, "")})[0] == {A: (5, "")}, "a whole failed commit: again"


def test_an_offset_answered_is_matched_to_what_was_sent():
    """An answer with another offset (the broker's view differs) is not an acceptance
    of the value sent."""
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, "")})[0])
    book.answered(None, [CommitAnswer(A, 4)], owned={A})
    assert book.to_send({A: (5, "")})[0] == {A: (5, "")}


def test_a_send_refused_at_once_holds_nothing_back():
    book = CommitBook(clock=Clock())
    book.sent(book.to_send({A: (5, "")})[0])
    book.send_failed()
    assert not book.waiting()
    assert book.to_send({A: (5, "")})[0] == {A: (5, "")}
    assert book.answered(None, [CommitAnswer(A, 5)], owned={A}) == [], "stray answer"


def test_synchronous_acceptances_reach_the_caller_too():
    book = CommitBook(clock=Clock())
    book.accepted_now({A: (3, "x")})
    assert book.to_send({A: (3, "x")}) == ({}, {A: (3, "x")})
